"""convfactor.data"""
