"""convfactor.rank"""
