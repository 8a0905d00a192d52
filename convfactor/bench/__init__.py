"""convfactor.bench"""
